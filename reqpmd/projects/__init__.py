"""Projects: packages whose spec lives in git, built again whenever their branch moves."""
