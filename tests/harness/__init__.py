"""Local stand-ins for the cloud services the launcher talks to, so its tests run offline."""
