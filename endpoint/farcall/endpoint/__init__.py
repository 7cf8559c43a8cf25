"""farcall.endpoint: the agent an operator runs to execute tasks for the broker.

The package imports nothing heavy at the top, so ``farcall.endpoint.worker``
stays cheap to import inside worker processes.
"""
