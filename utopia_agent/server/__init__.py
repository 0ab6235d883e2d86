"""The gunicorn worker: whole requests read in its event loop before a thread takes them."""
