"""Query generation: native Arabic, English cross-lingual and thematic queries, by LLM or offline."""
