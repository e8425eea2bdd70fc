"""The tools around the server, each a `diffuserve` subcommand: bench (latency, load, faults, fuzz), evaluate and
gallery (the bundled model's drawings), demo; and the shapes world the bundled model is trained and graded on."""
