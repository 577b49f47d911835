"""dex-realtime-shim: one event stream served over the legacy hub protocol and the
Centrifuge client protocol v2. Layers, top to bottom (docs/architecture.md):
`shim.app` (composition root) > `shim.transport`, `shim.centrifuge`, `legacy`,
`adapters` (independent of one another) > `shim.core` (protocol-free)."""

__version__ = "0.1.0"
