"""HTTP routes, one module per resource, wired in `server.app`."""
