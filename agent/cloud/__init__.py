"""Cloud fallback: ask a bigger model only when the local one is unsure.

The pieces, each in its own module:

* ``config``        the ``fallback:`` section of the agent config;
* ``client``        an Open Inference Protocol (KServe v2) client for any OIP server;
* ``breaker``       circuit breakers: the endpoint's offline state and one per model;
* ``budget``        calls per minute and calls in flight per model;
* ``policy``        per-model policy (bundle defaults + config) and the edge/cloud decision;
* ``hard_examples`` the SQLite store of hard cases, its writer thread and the retry loop;
* ``fallback``      the stateful glue: gate, call, classify the failure, record;
* ``metrics``       the fallback's Prometheus series.

``agent.inference`` is what the request handlers call: it runs the edge model and
uses these to decide whether and how to involve the cloud.
"""
