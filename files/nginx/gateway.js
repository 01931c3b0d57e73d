// llmpods gateway: the API key index, readiness, and the answer to a request nginx could not parse.
//
// Written for njs 0.7 (the version Debian bookworm ships): each request runs in a fresh copy of the JavaScript VM, so
// nothing a request stores in a global survives it. State that must outlive a request lives in files under the run
// directory: the readiness latch and the key index.
//
// The key index. nginx checks API keys itself, without JavaScript, against a directory that mirrors the keys file:
//   <index>/v-<file version>/k-<key>   an empty file per key (a key with "/" in it becomes nested directories)
//   <index>/s-<second>                 a link to the version directory, made the first time in that second (nginx's
//                                      $time_iso8601) the keys file was found to be that version
// While the link for the current second exists, a token is a key exactly when its k- file exists under it. When it
// does not (the first request of a second), nginx asks keyOk, which looks at the keys file, mirrors it into a new
// version directory if it changed (so the file is read once per change), makes the link and answers. A change to
// the keys file thus counts within a second, without a reload.
//
// nginx.conf passes the settings as variables:
//   $llmpods_model          the model id the backend must list
//   $llmpods_keys_file      the API keys, one per line; blank lines and lines starting with # are ignored
//   $llmpods_key_index      the key index directory
//   $llmpods_ready_marker   the readiness latch file
//   $llmpods_bearer_token   the token of "Authorization: Bearer <token>" when it has the syntax of a key, or ""

import fs from 'fs';

const AUTH_CHALLENGE = 'Bearer realm="llmpods"';
// The syntax of a key, as in nginx.conf's $llmpods_bearer_token (keep the two alike): RFC 6750 token characters,
// at most 200 of them, no "/" at either end, no "//", and no path segment that starts with ".". Other lines of
// the keys file are ignored.
const KEY_SYNTAX = /^(?=[^ ]{1,200}$)[A-Za-z0-9_~+=-][A-Za-z0-9._~+=-]*(?:\/[A-Za-z0-9_~+=-][A-Za-z0-9._~+=-]*)*$/;
// Links and version directories older than this are removed (ms); two seconds keeps the previous second's link.
const KEEP_MS = 2000;

function readKeys(path) {
    const lines = fs.readFileSync(path, 'utf8').split('\n');
    const keys = [];
    for (let i = 0; i < lines.length; i++) {
        const line = lines[i].trim();
        if (line.length > 0 && line[0] !== '#' && KEY_SYNTAX.test(line)) {
            keys.push(line);
        }
    }
    return keys;
}

// 1 when a and b are equal. Takes the same time wherever they differ (the length is not hidden).
function same(a, b) {
    if (a.length !== b.length) {
        return 0;
    }
    let diff = 0;
    for (let i = 0; i < a.length; i++) {
        diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
    }
    return diff === 0 ? 1 : 0;
}

function holds(keys, token) {
    let found = 0;
    for (let i = 0; i < keys.length; i++) {
        found |= same(token, keys[i]);
    }
    return found ? '1' : '0';
}

function exists(path) {
    try {
        fs.accessSync(path);
        return true;
    } catch (e) {
        return false;
    }
}

function isFile(path) {
    try {
        return fs.statSync(path).isFile();
    } catch (e) {
        return false;
    }
}

function removeTree(path) {
    try {
        fs.rmdirSync(path, { recursive: true });
    } catch (e) {
        // Gone already; anything left is removed by a later prune.
    }
}

// The version of the keys file: a new inode (an atomic replace, as the kubelet does), another size or mtime.
function fileVersion(path) {
    const st = fs.statSync(path);
    return `v-${st.ino}-${st.size}-${st.mtimeMs}-${st.ctimeMs}`;
}

// Mirror the keys into <index>/<name>. False when the index cannot hold them (one key is another one plus "/...",
// or the run directory is not writable): keyOk then compares the token itself.
function mirror(index, name, keys) {
    const tmp = `${index}/tmp-${name}-${process.pid}`;
    removeTree(tmp);
    try {
        fs.mkdirSync(tmp, { mode: 0o700 });
        for (let i = 0; i < keys.length; i++) {
            const entry = `${tmp}/k-${keys[i]}`;
            fs.mkdirSync(entry.slice(0, entry.lastIndexOf('/')), { recursive: true, mode: 0o700 });
            fs.writeFileSync(entry, '');
        }
        fs.renameSync(tmp, `${index}/${name}`);
        return true;
    } catch (e) {
        removeTree(tmp);
        return exists(`${index}/${name}`); // another worker made it meanwhile
    }
}

// Point <index>/s-<second> at the version directory (atomically: a new link renamed over any old one).
function link(index, name, second) {
    const path = `${index}/s-${second}`;
    const tmp = `${path}.${process.pid}`;
    try {
        try {
            fs.unlinkSync(tmp);
        } catch (e) {
            // No leftover.
        }
        fs.symlinkSync(name, tmp);
        fs.renameSync(tmp, path);
    } catch (e) {
        // Without the link nginx asks keyOk again: slower, never wrong.
    }
}

// Remove links older than KEEP_MS, and version and temporary directories that are that old and no link uses.
function prune(index, current) {
    const now = Date.now();
    const used = {};
    used[current] = true;
    const old = [];
    let names;
    try {
        names = fs.readdirSync(index);
    } catch (e) {
        return;
    }
    for (let i = 0; i < names.length; i++) {
        const path = `${index}/${names[i]}`;
        let st;
        try {
            st = fs.lstatSync(path);
        } catch (e) {
            continue;
        }
        if (now - st.mtimeMs <= KEEP_MS) {
            if (names[i].startsWith('s-')) {
                try {
                    const target = fs.realpathSync(path);
                    used[target.slice(target.lastIndexOf('/') + 1)] = true;
                } catch (e) {
                    // A link to a directory already gone.
                }
            }
            continue;
        }
        old.push(names[i]);
    }
    for (let i = 0; i < old.length; i++) {
        const path = `${index}/${old[i]}`;
        if (old[i].startsWith('s-')) {
            try {
                fs.unlinkSync(path);
            } catch (e) {
                // Removed by another worker.
            }
        } else if (!used[old[i]]) {
            removeTree(path);
        }
    }
}

// js_set handler for $llmpods_key_check, asked only while the key index is not confirmed for the current second:
// "1" when the bearer token is one of the keys. Reads the keys file only when it changed; never logs (a log line
// of this request would carry its request line).
function keyOk(r) {
    const token = r.variables.llmpods_bearer_token;
    if (!token) {
        return '0';
    }
    const file = r.variables.llmpods_keys_file;
    const index = r.variables.llmpods_key_index;
    let name;
    try {
        name = fileVersion(file);
    } catch (e) {
        return '0'; // no keys file, no key (/alive says so)
    }
    try {
        fs.mkdirSync(index, { mode: 0o700 });
    } catch (e) {
        // Exists (or cannot be made: then mirror fails below and the keys are compared here).
    }
    let keys = null;
    if (!exists(`${index}/${name}`)) {
        try {
            keys = readKeys(file);
        } catch (e) {
            return '0';
        }
        if (!mirror(index, name, keys)) {
            return holds(keys, token);
        }
    }
    link(index, name, r.variables.time_iso8601);
    prune(index, name);
    if (keys !== null) {
        return holds(keys, token);
    }
    return isFile(`${index}/${name}/k-${token}`) ? '1' : '0';
}

function sendJson(r, status, body) {
    r.headersOut['Content-Type'] = 'application/json';
    r.headersOut['Cache-Control'] = 'no-store';
    r.return(status, JSON.stringify(body) + '\n');
}

function apiError(message, type, code) {
    return { error: { message: message, type: type, param: null, code: code } };
}

// error_page 400 handler: nginx could not parse the request line or a header. Two Authorization headers are one of
// those; that is an authentication failure, so it gets the same answer as a wrong key.
function badRequest(r) {
    let authorizations = 0;
    const raw = r.rawHeadersIn;
    for (let i = 0; i < raw.length; i++) {
        if (raw[i][0].toLowerCase() === 'authorization') {
            authorizations++;
        }
    }
    if (authorizations > 1) {
        r.headersOut['WWW-Authenticate'] = AUTH_CHALLENGE;
        sendJson(r, 401, apiError('Send exactly one Authorization header: Authorization: Bearer <key>',
            'invalid_request_error', 'invalid_api_key'));
        return;
    }
    sendJson(r, 400, apiError('The request is not valid HTTP/1.1: its request line or a header could not be parsed.',
        'invalid_request_error', 'bad_request'));
}

function latched(marker) {
    return exists(marker);
}

function latch(r, marker) {
    try {
        fs.writeFileSync(marker, `${r.variables.llmpods_model}\n`);
    } catch (e) {
        r.error(`llmpods: cannot write the readiness latch ${marker}: ${e.message}`);
    }
}

function unlatch(r, marker) {
    try {
        fs.unlinkSync(marker);
    } catch (e) {
        r.error(`llmpods: cannot remove the readiness latch ${marker}: ${e.message}`);
    }
}

function hasKeys(r) {
    try {
        return readKeys(r.variables.llmpods_keys_file).length > 0;
    } catch (e) {
        return false;
    }
}

function listedModels(text) {
    const ids = [];
    const data = JSON.parse(text).data;
    for (let i = 0; i < data.length; i++) {
        ids.push(data[i].id);
    }
    return ids;
}

// Readiness (/alive).
// The probe (/_llmpods/probe) is a lock-free check of the backend: for llama-cpp-python a path it does not serve
// (its 404 comes from the web framework without the model lock), for llama-server its /health (503 while the model
// loads). Before the first success: the probe must answer below 500, then GET /v1/models on the backend must list
// the model (llama-cpp-python's takes the model lock, free while nothing is generating yet; llama-server lists the
// model before it is loaded, hence the probe first). After it (latched): the probe alone, so a running generation
// neither delays this check nor is interrupted by it. A 5xx, connection refused or a timeout drops the latch: 503,
// and the next check lists models again.
async function alive(r) {
    const model = r.variables.llmpods_model;
    const marker = r.variables.llmpods_ready_marker;

    if (!hasKeys(r)) {
        sendJson(r, 503, {
            status: 'no_keys', model: model,
            message: `no API key in ${r.variables.llmpods_keys_file} (a key is 1 to 200 of A-Z a-z 0-9 - . _ ~ + / =)`,
        });
        return;
    }

    if (latched(marker)) {
        const probe = await r.subrequest('/_llmpods/probe');
        if (probe.status < 500) {
            sendJson(r, 200, { status: 'ready', model: model });
            return;
        }
        unlatch(r, marker);
        sendJson(r, 503, {
            status: 'unavailable', model: model,
            message: `the inference backend stopped answering (gateway status ${probe.status})`,
        });
        return;
    }

    const health = await r.subrequest('/_llmpods/probe');
    if (health.status >= 500) {
        sendJson(r, 503, {
            status: 'loading', model: model,
            message: `the inference backend is not ready (gateway status ${health.status})`,
        });
        return;
    }
    const reply = await r.subrequest('/_llmpods/models');
    if (reply.status !== 200) {
        sendJson(r, 503, {
            status: 'loading', model: model,
            message: `GET /v1/models on the inference backend: status ${reply.status}`,
        });
        return;
    }
    let ids;
    try {
        ids = listedModels(reply.responseText);
    } catch (e) {
        sendJson(r, 503, {
            status: 'loading', model: model,
            message: `GET /v1/models on the inference backend: unexpected answer (${e.message})`,
        });
        return;
    }
    if (ids.indexOf(model) < 0) {
        sendJson(r, 503, {
            status: 'model_not_listed', model: model, listed: ids,
            message: `the inference backend does not serve model ${model}`,
        });
        return;
    }
    latch(r, marker);
    sendJson(r, 200, { status: 'ready', model: model });
}

// The tokenizer routes for the llama-server backend (nginx.conf sends /extras/* here when it is the backend):
// llama-cpp-python's request and answer shapes, from llama-server's own routes. The text is tokenized as a
// completion prompt is (with the model's start token, special tokens parsed), so that
//   /extras/tokenize          {"input": "..."}              -> {"tokens": [...]}
//   /extras/tokenize/count    {"input": "..."}              -> {"count": n}, the length of /extras/tokenize
//   /extras/tokenize/count    a whole chat completion request -> {"count": n}, its usage.prompt_tokens: the prompt
//                             llama-server's /apply-template makes from it, tokenized as the chat route does
//   /extras/detokenize        {"tokens": [...]}             -> {"text": "..."}, ids checked against the vocabulary
// A bad request gets a 400 here, before anything reaches the backend.
const BACKEND = '/_llmpods/backend';

// An error of the client's request: a 400 naming the field.
function requestError(message, param, code) {
    const error = new Error(message);
    error.param = param;
    error.code = code || 'invalid_value';
    error.request = true;
    return error;
}

function requestJson(r) {
    const fault = jsonFault(r);
    if (fault !== null) {
        throw requestError(fault, null, 'invalid_json');
    }
    const body = JSON.parse(r.requestText);
    if (body === null || typeof body !== 'object' || Array.isArray(body)) {
        throw requestError('The request body must be a JSON object.', null);
    }
    return body;
}

async function backendJson(r, path, body) {
    const reply = await r.subrequest(`${BACKEND}${path}`, { method: 'POST', body: JSON.stringify(body) });
    if (reply.status !== 200) {
        const error = new Error(`POST ${path} on the inference backend: status ${reply.status}`);
        error.status = reply.status;
        error.text = reply.responseText;
        throw error;
    }
    return JSON.parse(reply.responseText);
}

async function tokenize(r, text) {
    if (typeof text !== 'string') {
        throw requestError('input: must be a string.', 'input');
    }
    return (await backendJson(r, '/tokenize', { content: text, add_special: true, parse_special: true })).tokens;
}

async function vocabularySize(r) {
    // Not /_llmpods/models: that location forwards no body but would pass on this request's Content-Length.
    const reply = await r.subrequest(`${BACKEND}/v1/models`, { method: 'GET' });
    const data = JSON.parse(reply.responseText).data || [];
    for (let i = 0; i < data.length; i++) {
        if (data[i].id === r.variables.llmpods_model && data[i].meta && data[i].meta.n_vocab) {
            return data[i].meta.n_vocab;
        }
    }
    throw new Error('GET /v1/models on the inference backend: no vocabulary size for the model');
}

async function extrasAnswer(r, route, body) {
    if (route === '/extras/tokenize') {
        return { tokens: await tokenize(r, body.input) };
    }
    if (route === '/extras/detokenize') {
        const tokens = body.tokens;
        if (!Array.isArray(tokens)) {
            throw requestError('tokens: must be a list of token ids.', 'tokens');
        }
        const size = await vocabularySize(r);
        for (let i = 0; i < tokens.length; i++) {
            if (!Number.isInteger(tokens[i]) || tokens[i] < 0 || tokens[i] >= size) {
                throw requestError(`tokens: ${JSON.stringify(tokens[i]).slice(0, 40)} is not a token id of this `
                    + `model (0 to ${size - 1}).`, 'tokens');
            }
        }
        return { text: (await backendJson(r, '/detokenize', { tokens: tokens })).content };
    }
    if (body.messages === undefined) {
        return { count: (await tokenize(r, body.input)).length };
    }
    if (!Array.isArray(body.messages) || body.messages.length === 0) {
        throw requestError('messages: must be a non-empty list of chat messages.', 'messages');
    }
    for (let i = 0; i < body.messages.length; i++) {
        const message = body.messages[i];
        if (message === null || typeof message !== 'object' || typeof message.role !== 'string') {
            throw requestError(`messages[${i}]: must be a message with a role.`, 'messages');
        }
    }
    let prompt;
    try {
        prompt = (await backendJson(r, '/apply-template', body)).prompt;
    } catch (e) {
        if (e.status >= 500 && e.status < 600) {
            // The template failed on what the request holds (llama-server answers that with a 500).
            throw requestError("messages: the model's chat template cannot format these messages.", 'messages');
        }
        throw e;
    }
    return { count: (await tokenize(r, prompt)).length };
}

async function extras(r) {
    const route = r.variables.llmpods_route;
    let answer;
    // njs 0.7 crashes on an await inside a call's arguments within try: the answer is awaited on its own.
    try {
        answer = await extrasAnswer(r, route, requestJson(r));
    } catch (e) {
        if (e.request) {
            const error = apiError(e.message, 'invalid_request_error', e.code);
            error.error.param = e.param;
            sendJson(r, 400, error);
        } else if (e.status >= 400 && e.status < 500) {
            // The backend refused the request (a chat request its template cannot take, say): its own answer, in
            // the OpenAI error shape.
            r.headersOut['Content-Type'] = 'application/json';
            r.return(e.status, openaiError(e.text, e.status));
        } else {
            r.error(`llmpods: ${route}: ${e.message}`);
            sendJson(r, 502, apiError(`The inference backend for model ${r.variables.llmpods_model} is not answering.`,
                'server_error', 'backend_unavailable'));
        }
        return;
    }
    sendJson(r, 200, answer);
}

// llama-server's refusals, {"error": {"code": 400, "message": "...", "type": "..."}}, in the OpenAI shape that every
// answer of this gateway has: {"error": {"message", "type", "param", "code"}}, with the type one of
// invalid_request_error and server_error and the code a word. nginx.conf runs these on the llama-server backend's
// answers (js_header_filter, js_body_filter): only a 4xx answer is rewritten, everything else passes untouched.
const LLAMA_SERVER_CODES = {
    authentication_error: 'invalid_api_key',
    exceed_context_size_error: 'context_length_exceeded',
    not_supported_error: 'not_supported',
    permission_error: 'permission_denied',
};
let errorText = '';

function refused(r) {
    return r.status >= 400 && r.status < 500;
}

function errorHeaders(r) {
    if (refused(r)) {
        delete r.headersOut['Content-Length'];
        r.headersOut['Content-Type'] = 'application/json';
    }
}

function openaiError(text, status) {
    let error = {};
    try {
        error = JSON.parse(text).error || {};
    } catch (e) {
        error = {};
    }
    const message = typeof error.message === 'string' && error.message ? error.message : `Request refused (${status}).`;
    let code = LLAMA_SERVER_CODES[error.type] || (status === 400 ? 'invalid_value' : `http_${status}`);
    if (code === 'invalid_value' && message.indexOf('failed to parse grammar') >= 0) {
        code = 'invalid_grammar';
    }
    return JSON.stringify(apiError(message, 'invalid_request_error', code)) + '\n';
}

function errorBody(r, data, flags) {
    if (!refused(r)) {
        r.sendBuffer(data, flags);
        return;
    }
    errorText += data;
    if (flags.last) {
        r.sendBuffer(openaiError(errorText, r.status), flags);
    }
}

// Does the JSON text hold a \u escape of half a surrogate pair without its other half? njs reads one as U+FFFD,
// llama-server refuses it. Every backslash of valid JSON starts an escape, so the escapes are read in order.
function unpairedSurrogate(text) {
    const escape = /\\(?:u([0-9a-fA-F]{4})|[^u])/g;
    let pairEnd = -1;
    let found;
    while ((found = escape.exec(text)) !== null) {
        const unit = found[1] === undefined ? -1 : parseInt(found[1], 16);
        const low = unit >= 0xdc00 && unit <= 0xdfff;
        if (pairEnd >= 0) {
            if (!low || found.index !== pairEnd) {
                return true;
            }
            pairEnd = -1;
        } else if (unit >= 0xd800 && unit <= 0xdbff) {
            pairEnd = escape.lastIndex;
        } else if (low) {
            return true;
        }
    }
    return pairEnd >= 0;
}

// llama-server answers some requests that are the client's fault with a 500: a body that is not JSON it can parse
// (not UTF-8, an unpaired surrogate escape, truncated), and chat messages or tools of the wrong shape ("Failed to
// parse messages: ..."). nginx.conf sends the backend's 500s here (error_page): a request that is such a fault gets
// a 400 naming it, anything else the gateway's 500. Nothing generates again: a chat request is checked with
// llama-server's /apply-template, which parses the messages and tools as the chat route does.
function jsonFault(r) {
    let text;
    try {
        text = new TextDecoder('utf-8', { fatal: true }).decode(r.requestBuffer || '');
        JSON.parse(text);
    } catch (e) {
        return 'The request body is not valid JSON (UTF-8).';
    }
    if (unpairedSurrogate(text)) {
        return 'The request body is not valid JSON: a \\u escape is an unpaired UTF-16 surrogate.';
    }
    return null;
}

async function backendFailed(r) {
    const fault = jsonFault(r);
    if (fault !== null) {
        sendJson(r, 400, apiError(fault, 'invalid_request_error', 'invalid_json'));
        return;
    }
    if (r.variables.llmpods_route === '/v1/chat/completions') {
        const reply = await r.subrequest(`${BACKEND}/apply-template`, { method: 'POST', body: r.requestText });
        let message = '';
        try {
            message = JSON.parse(reply.responseText).error.message || '';
        } catch (e) {
            message = '';
        }
        if (reply.status >= 400 && reply.status < 600 && message) {
            sendJson(r, 400, apiError(message, 'invalid_request_error', 'invalid_value'));
            return;
        }
    }
    r.error('llmpods: the inference backend answered 500');
    sendJson(r, 500, apiError('The gateway failed on this request.', 'server_error', 'server_error'));
}

export default { keyOk, alive, badRequest, extras, errorHeaders, errorBody, backendFailed };
