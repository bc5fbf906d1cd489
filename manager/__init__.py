"""The manager process: shared base weights, scheduler, one worker per client."""
