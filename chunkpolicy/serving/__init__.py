"""Serving a policy to a robot: ``chunkpolicy serve`` (openpi's websocket protocol) and a torch-free client.

:mod:`.protocol` (wire format, observation schema; torch-free), :mod:`.server` (the server; torch),
:mod:`.client` (the robot side; torch-free). Nothing is imported here, so ``import chunkpolicy.serving.client`` stays
light.
"""
