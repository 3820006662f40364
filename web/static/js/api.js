// The node's HTTP JSON API (docs/protocol.md section 3), as the page uses it.
//
// The session travels in the HttpOnly cookie the node sets at login, so page script
// never sees the token; fetch sends the cookie and an Origin header, which is what
// the node checks against cross-site requests.

export class ApiError extends Error {
  constructor(status, code, message, details = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

/** One API call; resolves to the parsed JSON answer or throws ApiError. A Blob body
 * (an image) is sent as it is, with its own type; anything else as JSON. */
export async function api(method, path, body = undefined) {
  const init = { method, credentials: "same-origin", headers: {}, cache: "no-store" };
  if (body instanceof Blob) {
    init.headers["Content-Type"] = body.type;
    init.body = body;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, "network", "The node cannot be reached. Check your connection.");
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const err = (data && data.error) || {};
    throw new ApiError(response.status, err.code || `http_${response.status}`,
      err.message || response.statusText || "request failed", err.details || {});
  }
  return data;
}

export const enc = encodeURIComponent;
