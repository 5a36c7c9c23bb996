"""`neuronserve loadtest`: closed- and open-loop load against a live endpoint.

Entry points live in :mod:`neuronserve.deploy.loadtest.cli`; the pieces (workloads, arrival schedules,
statistics, cost, HTTP client, report) are plain modules so they can be tested on their own.
"""
