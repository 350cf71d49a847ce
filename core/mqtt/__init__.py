"""The MQTT client shared by the agent and the fleet: paho-mqtt 2.x on the asyncio loop.

Import what you need from its modules (this package imports nothing itself, so a
config that only needs :mod:`.config` does not load paho):

- ``config``: :class:`~.config.MqttConnectionConfig`, one broker connection's settings
  (the fleet's ``broker:`` section; the agent's ``fleet:`` section extends it);
- ``connection``: :class:`~.connection.MqttConnection`, the client (acks as futures,
  reconnect with jittered backoff, resubscription), with hooks for a Last Will and
  birth/farewell messages (the agent's device link, ``agent/mqtt_link.py``, uses them);
- ``messages``: :class:`~.messages.Message`, handlers and subscriptions;
- ``errors``: the :class:`~.errors.LinkError` tree;
- ``filters``: topic filter checks; ``topics``: the agent ⇄ fleet topic layout.
"""
