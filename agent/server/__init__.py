"""The agent's HTTP server: thin handlers over the data plane (OIP, image, admin, fleet)."""
