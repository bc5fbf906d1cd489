"""A Menos cluster on Ray: many managers behind one gateway endpoint (``menos-cluster``)."""
