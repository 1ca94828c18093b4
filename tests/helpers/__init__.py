"""What the tests share, as plain code (tests/conftest.py only names the fixture plugins):

- ``models``: the tiny UNet built from config and random adapter factors;
- ``services``: PostgreSQL databases, the Redis URL, SeaweedFS (S3) and `krona up` in a process of its own;
- ``api``: the gateway's test client wrapper, the recording broker, test images and adapter files;
- ``deploy``: rendering the Kubernetes overlays;
- ``webhooks``: a webhook receiver on loopback;
- ``fixtures``: every shared pytest fixture (models, services, the API, whole stacks);
- ``tiers``: the unit / models / integration / e2e markers given to each test from what it uses.
"""
