"""Dataset source plugins: each turns a path into (uri, label) items to register."""
