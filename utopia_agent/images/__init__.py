"""Images: pulls within their timeouts with their progress, private images, listing and collection."""
