"""The pipeline: the job runner (which studies can move now) and the stages of one series, in order:
pseudonymise (per job) -> infer -> structure -> reidentify -> send.
"""
