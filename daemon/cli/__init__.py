"""User-facing commands: the `kvferry` entry point, the HTTP client, the launcher, the demo,
`kvferry bench` and `kvferry fuzz`."""
