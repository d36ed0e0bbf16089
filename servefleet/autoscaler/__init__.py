"""The autoscaler service: sets each autoscaled application's replica count through the keeper.

``policy.py`` and ``forecast.py`` hold the decision logic (pure, replayed by unit tests);
``core.py`` the loop; ``sources.py`` its backends; ``servicer.py`` the thin gRPC layer."""
