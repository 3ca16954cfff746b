"""`tkg.integrations`: tkg behind other libraries' extension points (optional extras)."""
