"""A seeded synthetic NLU corpus: voice-assistant requests from devices with heavy-tailed activity.

The embedded default dataset: it needs no network and is the same on every machine for a seed.
Each utterance comes from a template of one of 30 intents, filled with slot values (cities,
times, contacts, songs ...), and is attributed to a device. Devices differ in how active they are
(utterances per device follow a Pareto law, as real usage does) and in which intents they use
(a Dirichlet preference per device), so partitioning by device is naturally non-IID. Each
utterance carries a timestamp within `num_days`, for continual-learning splits.
"""

from __future__ import annotations

import re

import numpy as np

from trustjax.data.corpus import TextDataset

SLOT_VALUES: dict[str, tuple[str, ...]] = {
    "city": ("london", "paris", "new york", "tokyo", "berlin", "madrid", "boston", "seattle",
             "sydney", "toronto", "rome", "chicago", "mumbai", "lagos", "lima", "oslo"),
    "time": ("7 am", "6:30", "noon", "midnight", "8 pm", "half past five", "9 in the morning",
             "quarter to ten", "10 pm", "5 o'clock"),
    "date": ("today", "tomorrow", "on friday", "next monday", "this weekend", "on the 3rd",
             "next week", "tonight"),
    "contact": ("mom", "dad", "alex", "sarah", "dr. lee", "the office", "grandma", "james",
                "maria", "my boss"),
    "artist": ("the beatles", "adele", "miles davis", "taylor swift", "bach", "nirvana",
               "beyonce", "radiohead", "coldplay", "bob marley"),
    "song": ("yesterday", "hello", "so what", "clocks", "one love", "creep", "halo",
             "shake it off"),
    "cuisine": ("italian", "thai", "sushi", "mexican", "indian", "vegan", "french", "korean"),
    "number": ("two", "three", "four", "five", "six", "ten", "twelve"),
    "duration": ("five minutes", "ten minutes", "an hour", "thirty seconds", "20 minutes",
                 "two hours"),
    "room": ("kitchen", "living room", "bedroom", "hallway", "office", "garage", "bathroom"),
    "item": ("milk", "eggs", "bread", "coffee", "batteries", "apples", "rice", "soap"),
    "list": ("shopping list", "todo list", "packing list", "grocery list"),
    "temperature": ("20 degrees", "68 degrees", "72", "18 degrees", "warmer", "cooler"),
    "language": ("spanish", "french", "german", "japanese", "italian", "swahili"),
    "phrase": ("good morning", "where is the station", "thank you very much", "how much is it",
               "i am lost"),
    "event": ("dentist appointment", "team meeting", "lunch with alex", "yoga class",
              "flight to paris", "birthday party"),
    "podcast": ("the daily", "radiolab", "serial", "this american life", "planet money"),
    "movie": ("dune", "the matrix", "inception", "frozen", "oppenheimer", "up"),
    "currency": ("dollars", "euros", "yen", "pounds", "rupees"),
    "company": ("apple", "tesla", "google", "amazon", "nvidia", "ikea"),
    "word": ("serendipity", "ephemeral", "ubiquitous", "gregarious", "laconic"),
    "app": ("maps", "camera", "spotify", "the calculator", "settings", "email"),
    "place": ("the airport", "home", "work", "the station", "downtown", "the hospital"),
}

INTENTS: dict[str, tuple[str, ...]] = {
    "weather_query": ("what's the weather in {city} {date}", "will it rain in {city} {date}",
                      "how hot will it be {date}", "is it going to snow in {city}"),
    "set_alarm": ("set an alarm for {time}", "wake me up at {time} {date}",
                  "alarm at {time} please", "i need an alarm {date} at {time}"),
    "cancel_alarm": ("cancel my alarm for {time}", "turn off the {time} alarm",
                     "delete all alarms {date}", "remove the alarm"),
    "play_music": ("play {song} by {artist}", "put on some {artist}", "play music by {artist}",
                   "i want to hear {song}"),
    "pause_music": ("pause the music", "stop playing", "pause {song}", "hold the song"),
    "volume_up": ("turn it up", "louder please", "increase the volume to {number}",
                  "volume up by {number}"),
    "volume_down": ("turn it down", "quieter please", "lower the volume to {number}",
                    "volume down a bit"),
    "call_contact": ("call {contact}", "phone {contact} on speaker", "dial {contact} now",
                     "ring {contact}"),
    "send_message": ("text {contact} that i am late", "send a message to {contact}",
                     "tell {contact} i will be there at {time}", "message {contact} {date}"),
    "book_restaurant": ("book a table for {number} at an {cuisine} place",
                        "reserve a {cuisine} restaurant in {city} for {number}",
                        "find me a table for {number} {date} at {time}",
                        "i want to eat {cuisine} food {date}"),
    "set_timer": ("set a timer for {duration}", "start a {duration} timer",
                  "timer {duration} please", "count down {duration}"),
    "add_to_list": ("add {item} to my {list}", "put {item} on the {list}",
                    "remember to buy {item}", "add {number} {item} to the {list}"),
    "read_list": ("what's on my {list}", "read me the {list}", "show my {list}",
                  "what do i need from the {list}"),
    "turn_on_light": ("turn on the {room} lights", "lights on in the {room}",
                      "switch on the lamp in the {room}", "brighten the {room}"),
    "turn_off_light": ("turn off the {room} lights", "lights off in the {room}",
                       "switch off the {room} lamp", "kill the lights"),
    "set_thermostat": ("set the thermostat to {temperature}", "make it {temperature} in the {room}",
                       "heat the {room} to {temperature}", "change the temperature to {temperature}"),
    "news_query": ("what's the news {date}", "read me the headlines", "news from {city}",
                   "any news about {company}"),
    "traffic_query": ("how is the traffic to {place}", "how long to drive to {place}",
                      "is there traffic in {city}", "traffic on my way to {place}"),
    "book_taxi": ("get me a taxi to {place}", "book a cab to {place} at {time}",
                  "i need a ride to {place}", "order a car for {number} people"),
    "translate": ("translate {phrase} into {language}", "how do you say {phrase} in {language}",
                  "what is {phrase} in {language}", "say {phrase} in {language}"),
    "calendar_add": ("add {event} to my calendar {date}", "schedule {event} at {time}",
                     "put {event} in my calendar", "create an event {event} {date}"),
    "calendar_query": ("what's on my calendar {date}", "when is my {event}",
                       "do i have anything {date}", "what meetings do i have {date}"),
    "play_podcast": ("play the latest {podcast}", "resume {podcast}",
                     "next episode of {podcast}", "play a podcast"),
    "movie_showtimes": ("when is {movie} showing in {city}", "movie times for {movie} {date}",
                        "is {movie} playing {date}", "what films are on in {city}"),
    "currency_convert": ("convert {number} {currency} to {currency}",
                         "how many {currency} is {number} {currency}",
                         "exchange rate from {currency} to {currency}",
                         "what's {number} {currency} in {currency}"),
    "stock_price": ("how is {company} stock doing", "what's the share price of {company}",
                    "{company} stock price {date}", "did {company} go up"),
    "define_word": ("what does {word} mean", "define {word}", "meaning of the word {word}",
                    "look up {word} in the dictionary"),
    "set_reminder": ("remind me to buy {item} {date}", "remind me about the {event} at {time}",
                     "set a reminder to call {contact}", "don't let me forget {event}"),
    "open_app": ("open {app}", "launch {app} please", "start the {app} app", "go to {app}"),
    "tell_joke": ("tell me a joke", "make me laugh", "do you know any jokes",
                  "say something funny"),
}

_PREFIXES = ("", "", "", "please ", "hey assistant ", "can you ", "could you ", "ok ")
_SUFFIXES = ("", "", "", " please", " thanks", " now", " quickly")
_SLOT_RE = re.compile(r"\{(\w+)\}")


def _fill(template: str, rng: np.random.Generator) -> tuple[str, list[tuple[str, int, int]]]:
  """Fills a template; returns the text and the character spans of its slot values."""
  out, spans, pos = [], [], 0
  for m in _SLOT_RE.finditer(template):
    out.append(template[pos:m.start()])
    value = SLOT_VALUES[m.group(1)][rng.integers(len(SLOT_VALUES[m.group(1)]))]
    start = sum(len(s) for s in out)
    out.append(value)
    spans.append((m.group(1), start, start + len(value)))
    pos = m.end()
  out.append(template[pos:])
  return "".join(out), spans


def synthetic_nlu(num_examples: int = 20000, *, num_devices: int = 500, seed: int = 0,
                  activity_exponent: float = 1.2, intent_concentration: float = 0.5,
                  num_days: float = 30.0) -> TextDataset:
  """Generates the synthetic NLU corpus.

  Args:
    num_examples: number of utterances.
    num_devices: number of devices; every device has at least one utterance.
    seed: the corpus is a pure function of its arguments.
    activity_exponent: Pareto shape `a` of device activity (smaller = heavier tail).
    intent_concentration: Dirichlet concentration of each device's intent preferences.
    num_days: timestamps lie in [0, num_days * 86400) seconds.

  Returns:
    A TextDataset with labels (intent ids), device_ids, timestamps and slot spans.
  """
  if num_examples < 1:
    raise ValueError(f"num_examples must be >= 1, got {num_examples=}")
  if not 1 <= num_devices <= num_examples:
    raise ValueError(f"num_devices must lie in [1, {num_examples=}], got {num_devices=}")
  if activity_exponent <= 0 or intent_concentration <= 0 or num_days <= 0:
    raise ValueError(f"{activity_exponent=}, {intent_concentration=} and {num_days=} must be > 0")
  rng = np.random.default_rng(seed)
  names = tuple(INTENTS)
  # Heavy-tailed activity: Pareto weights, one utterance per device guaranteed.
  weights = rng.pareto(activity_exponent, num_devices) + 1.0
  counts = 1 + rng.multinomial(num_examples - num_devices, weights / weights.sum())
  device_ids = np.repeat(np.arange(num_devices, dtype=np.int32), counts)
  prefs = rng.dirichlet(np.full(len(names), intent_concentration), num_devices)
  labels = np.empty(num_examples, np.int32)
  for d in range(num_devices):
    rows = device_ids == d
    labels[rows] = rng.choice(len(names), size=counts[d], p=prefs[d])
  # Each device becomes active at a random day and stays active to the end.
  start = rng.uniform(0.0, 0.8 * num_days, num_devices)[device_ids]
  timestamps = 86400.0 * (start + rng.uniform(0.0, 1.0, num_examples) * (num_days - start))
  texts, slots = [], []
  for label in labels:
    templates = INTENTS[names[label]]
    text, spans = _fill(templates[rng.integers(len(templates))], rng)
    pre = _PREFIXES[rng.integers(len(_PREFIXES))]
    texts.append(pre + text + _SUFFIXES[rng.integers(len(_SUFFIXES))])
    slots.append([(s, a + len(pre), b + len(pre)) for s, a, b in spans])
  order = np.argsort(timestamps, kind="stable")
  return TextDataset(texts=[texts[i] for i in order], labels=labels[order], label_names=names,
                     device_ids=device_ids[order], timestamps=timestamps[order],
                     slots=[slots[i] for i in order])
