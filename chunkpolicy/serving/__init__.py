"""Serving a policy to a robot: ``chunkpolicy serve`` (openpi's websocket protocol) and a torch-free client.

:mod:`.protocol` (wire format, observation schema; torch-free), :mod:`.service` (requests → batches → replies;
torch), :mod:`.server` (the websocket server),
:mod:`.client` (the robot side; torch-free). Nothing is imported here, so ``import chunkpolicy.serving.client`` stays
light.
"""
