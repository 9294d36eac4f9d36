"""The command line: each command parses its options, calls a service, and renders the answer."""
