"""Cloud fallback: ask a bigger model only when the local one is unsure.

The pieces, each in its own module:

* ``config``        the ``fallback:`` section of the agent config;
* ``breaker``       circuit breakers: the endpoint's offline state and one per model;
* ``budget``        calls per minute and calls in flight per model;
* ``policy``        per-model policy (bundle defaults + config) and the per-item decision;
* ``fallback``      the one way to the cloud: gate, call, classify the failure, record;
* ``router``        who answers each item of a request (edge, cloud now, cloud later),
                    and the background work that follows;
* ``hard_examples`` the SQLite store of hard cases, its writer thread, the capture of
                    new cases and the retry loop;
* ``telemetry``     ``fallback_stats`` records for the fleet;
* ``metrics``       the fallback's Prometheus series.

The OIP client itself is ``edgefleet.core.oip_client``. The data plane
(``agent/dataplane.py``), which every inference API calls, runs the edge model and
scores its outputs, then asks the router whether and how to involve the cloud.
"""
