"""Chat requests: messages to template inputs, template rendering, images, tools and reasoning."""
