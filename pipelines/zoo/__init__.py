"""Small reference models trained here; their weights ship with the package."""
