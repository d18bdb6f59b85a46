"""The layers of MoCE-IR. Module and parameter names follow the official state-dict keys."""
