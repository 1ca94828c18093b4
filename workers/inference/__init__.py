"""Generation on the resident inference engine: one base pipeline per worker, the tenants' adapters in its slots.

The parts:

    engine.py   Engine: adapter slots (shared/krona/bank.py), the tiered adapter cache, mixed-adapter batches
    loop.py     DenoisingLoop: step-level joining, requests join and leave a running loop between steps
    job.py      run_generation_job: the Celery task's job, fed by the fair scheduler at every step boundary
"""
