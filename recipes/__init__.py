"""Stage and pipeline recipes for `salatrain train recipe=<name>` and `salatrain pipeline recipe=<name>`."""
