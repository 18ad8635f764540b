"""Lightning modules: what every task shares (``base``) and each task on top of it."""
