"""The routes, one module per resource: predict, model, health, page."""
