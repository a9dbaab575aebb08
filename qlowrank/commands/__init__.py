"""Sub-commands of the `qlowrank` CLI, one module each with `register(subparsers)`."""
