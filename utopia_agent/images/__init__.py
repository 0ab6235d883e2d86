"""Images: pulls within their timeouts, with progress logged and timed."""
