"""Ray-side services: cluster agent, application master, deployment actors, proxy."""
