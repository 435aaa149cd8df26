// Swagger UI from the app's own files (swagger-ui-bundle wheel): /docs works offline and
// under the page's Content-Security-Policy, which forbids inline scripts.
"use strict";

window.ui = window.SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [window.SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
  validatorUrl: null,
});
