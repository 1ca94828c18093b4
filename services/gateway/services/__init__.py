"""Service functions behind the routes: keyword-only arguments, no HTTP objects in their results."""
