"""HTTP routers: chat (REST), openai (OpenAI-compatible), health (service), page (browser)."""
