"""Tools and calls that the tool tests share: OpenAI function tools (one as a bare function dict), Meta's
built-ins, and Llama 3.2's documented get_weather."""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Météo d'une ville, « en direct » ✓",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
SONGS = {"name": "trending_songs", "description": "Returns the trending songs on a Music site",
         "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}  # a bare function dict
SEARCH = {"type": "function", "function": {
    "name": "brave_search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}
WOLFRAM = {"name": "wolfram_alpha", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}
CODE = {"name": "code_interpreter", "parameters": {"type": "object", "properties": {"code": {"type": "string"}}}}
# The function of llama-models' llama3_2/text_prompt_format.md, as an OpenAI tool.
GET_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get weather info for places",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The name of the city to get the weather for"},
        "metric": {"type": "string", "description": "The metric for weather. Options are: celsius, fahrenheit",
                   "default": "celsius"}}, "required": ["city"]}}}


def call(name: str, **arguments) -> dict:
    """An assistant message that calls `name` with `arguments`."""
    return {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "name": name, "arguments": arguments}]}
