"""A run, from its submission to its end: what the producer and the control workers do.

:mod:`.producer` submits, cancels, resumes, decides approvals and retries;
:mod:`.dispatch` sends each stage (and held or lost tasks); :mod:`.messages` builds and
publishes the Celery messages through the outbox; :mod:`.lifecycle` stops and ends runs;
:mod:`.reconcile` recovers what no message will move on; :mod:`.events` publishes every
committed change; :mod:`.ratelimit` holds the fleet-wide token buckets and slots;
:mod:`.liveness` a running attempt's Redis lease; :mod:`.faultpoints` the places the fault
suite strikes.
"""
