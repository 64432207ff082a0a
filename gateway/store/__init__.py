"""The store: the spool under ``data_dir``, the job database (jobs, tasks, deliveries, data keys, anchors), the keys,
sealing (AES-256-GCM per job and purpose), and the sealed outputs each stage hands the next.

The only code that knows paths under ``data_dir`` and the only code with SQL.
"""
