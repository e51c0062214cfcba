"""What producer, worker and aggregator all need: configuration, the message schema, the
broker topology, storage, input reading, processors and metrics. Imports none of them."""
