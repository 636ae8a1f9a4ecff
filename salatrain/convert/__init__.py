"""Dense checkpoint + layer plan → hybrid checkpoint."""
