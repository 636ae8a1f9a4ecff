"""Layer selection: which layers stay (sparse) attention — sweep, scoring methods, plan file and plot."""
