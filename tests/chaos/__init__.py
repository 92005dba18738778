"""A seeded chaos run: callers, workers and beat under overlapping faults, then a checker.

``python -m tests.chaos.run --profile short --seed 7`` starts a private RabbitMQ node (or a
three-node cluster for ``long``) and Redis, workers, beat and caller processes of both clients,
injects the seed's schedule of faults, writes every call and delivery to a JSON-lines history,
and checks that history against the broker's and the registry's final state
(:mod:`tests.chaos.checker`). The same seed replays the same schedule and the same calls.
"""
