"""The refinement app: InsPilot (working title Refinity), the design-stimulus workflow (docs/refinement.md)."""
