"""Sending: the C-STORE SCU and the delivery of each task's outbox to its destinations, with retries that survive
restarts.
"""
