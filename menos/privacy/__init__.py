"""Privacy at the cut, measured (issue 30): what an honest-but-curious server could read.

``traffic``: what crossed the cut for one run; ``tap``: a relay that records it without
touching the client or the server; ``attacks``: pure functions of the traffic and the public
base only (the victim's data never reaches them); ``tools.audit`` (menos-audit) drives them.
"""
