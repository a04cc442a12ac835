"""Chat completions: prompt rendering, the request service and SSE streaming."""
