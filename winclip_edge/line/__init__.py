"""The line runtime: live sources -> batcher -> Inspector -> sinks, run by ``winclip-edge serve`` (docs/line.md)."""
