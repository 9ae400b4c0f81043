"""Family (b): open-ended assistant prompts ("How do I sleep better?").

Two judged objectives that pull against each other:
- `thoroughness`: how many of the topic's key aspects the answer covers;
- `concision`: how little the reader has to wade through: relevant sentences only,
  within a short word budget, no filler.
Covering every aspect takes more words than the concision budget allows, so one
answer cannot max both. Held-out prompts are on topics never seen in training.
"""

from __future__ import annotations

import json
import random
import re

from pipeline.objectives.splitters import split_sentences

OBJECTIVES = [
    {"name": "thoroughness", "kind": "judged", "splitter": "sentences",
     "judge": {"callable": "pipeline.tasks.assistant:thoroughness"}},
    {"name": "concision", "kind": "judged", "splitter": "sentences",
     "judge": {"callable": "pipeline.tasks.assistant:concision"}},
]
WORD_BUDGET = 22  # concision: answers up to this many words are not penalised for length
MIN_WORDS = 7  # a sentence shorter than this covers no aspect (every aspect needs its own sentence)
FILLER = ("i hope this helps", "as an ai", "it is important to note", "in conclusion", "great question",
          "there are many things", "let me know if", "in today's world", "at the end of the day", "here are some tips")

# topic (an activity, "How do I {topic}?") -> aspects: (keyword stems, a sentence that covers it)
TOPICS: dict[str, list[tuple[tuple[str, ...], str]]] = {
    "keep houseplants alive": [
        (("light", "sun", "window"), "Place each plant where it gets the light its species needs."),
        (("water",), "Water only when the top of the soil feels dry."),
        (("drain", "holes"), "Use pots with drainage holes so roots never sit in water."),
        (("fertiliz", "feed"), "Feed them a diluted fertilizer during the growing season.")],
    "sleep better": [
        (("same time", "schedule", "routine"), "Go to bed and wake up at the same time every day."),
        (("screen", "phone"), "Put your phone and other screens away an hour before bed."),
        (("caffeine", "coffee"), "Avoid coffee and other caffeine after lunch."),
        (("dark", "cool", "quiet"), "Keep your bedroom dark, cool and quiet.")],
    "start running": [
        (("shoe",), "Buy running shoes that fit well and support your feet."),
        (("slow", "pace", "walk"), "Start slowly and mix running with walking breaks."),
        (("rest", "recover"), "Take rest days so your body can recover between runs."),
        (("warm",), "Warm up for five minutes before every run.")],
    "save money each month": [
        (("budget", "track"), "Track your spending and set a simple monthly budget."),
        (("automat", "transfer"), "Set up an automatic transfer to savings on payday."),
        (("subscription", "cancel"), "Cancel the subscriptions that you no longer really use."),
        (("emergency",), "Build an emergency fund before anything else.")],
    "prepare for a job interview": [
        (("research", "company"), "Research the company and the role before the interview."),
        (("example", "stories", "story"), "Prepare short stories that show your skills with real examples."),
        (("question",), "Write down a few questions to ask the interviewer."),
        (("practi", "rehears", "mock"), "Practice your answers out loud with a friend.")],
    "learn a new language": [
        (("daily", "every day", "habit"), "Practice a little every day so it becomes a habit."),
        (("speak", "conversation"), "Speak with native speakers as early as you can."),
        (("vocabular", "flashcard", "words"), "Learn common words with flashcards and spaced repetition."),
        (("listen", "podcast"), "Listen to podcasts or shows in the language.")],
    "write a clear email": [
        (("subject",), "Write a subject line that says what the email is about."),
        (("purpose", "point", "first line"), "State your main point in the first line."),
        (("short", "brief"), "Keep paragraphs short and cut anything unnecessary."),
        (("deadline", "next step", "action"), "End with the action you need and a deadline.")],
    "keep a laptop secure": [
        (("update",), "Install system and app updates as soon as they arrive."),
        (("password",), "Use a password manager and a unique password for every account."),
        (("two-factor", "second factor", "2fa"), "Turn on two-factor authentication wherever it is offered."),
        (("backup", "back up"), "Back up your files regularly to an external drive or the cloud.")],
    "cook fluffy rice": [
        (("rinse", "wash"), "Rinse the rice until the water runs clear."),
        (("ratio", "cups of water"), "Use the right ratio, about one and a half cups of water per cup of rice."),
        (("simmer", "low heat", "lid"), "Simmer it on low heat with the lid on."),
        (("rest", "steam"), "Let it rest covered for ten minutes before serving.")],
    "reduce stress": [
        (("breath",), "Take a few slow, deep breaths when tension builds."),
        (("exercise", "walk"), "Exercise or take a brisk walk most days."),
        (("sleep",), "Protect your sleep, since tiredness makes stress worse."),
        (("talk", "friend"), "Talk about what worries you with a friend.")],
    "give a good presentation": [
        (("structure", "outline"), "Give your talk a clear structure with a simple outline."),
        (("audience",), "Tailor the content to what your audience already knows."),
        (("rehears", "practi"), "Rehearse the whole talk at least twice."),
        (("slide",), "Keep slides simple, with few words and large visuals.")],
    "study for an exam": [
        (("spread", "spaced", "schedule"), "Spread your study sessions over several days."),
        (("test yourself", "practice question", "quiz"), "Test yourself with practice questions instead of rereading."),
        (("sleep",), "Get enough sleep so your memory can consolidate."),
        (("break",), "Take short breaks to keep your focus fresh.")],
    "take care of a dog": [
        (("walk", "exercise"), "Walk your dog every day so it gets enough exercise."),
        (("food", "diet", "feed"), "Feed it a balanced diet in measured portions."),
        (("vet",), "Take it to the vet for regular checkups and vaccines."),
        (("train",), "Train it with patience, short sessions and small rewards.")],
    "plan a trip abroad": [
        (("budget", "cost"), "Set a budget that covers travel, lodging and food."),
        (("book",), "Book flights and lodging early for better prices."),
        (("passport", "visa", "document"), "Check that your passport is valid and whether you need a visa."),
        (("pack",), "Pack light and bring only what you will use.")],
    "make a website load faster": [
        (("image", "compress"), "Compress images and serve them at the size they are shown."),
        (("cache", "caching"), "Turn on browser caching for static files."),
        (("javascript", "script"), "Remove unused JavaScript and load scripts lazily."),
        (("cdn", "content delivery"), "Serve files from a content delivery network close to users.")],
    "grow tomatoes": [
        (("sun",), "Plant them where they get at least six hours of sun."),
        (("stake", "cage", "support"), "Support the plants with stakes or cages as they grow."),
        (("water",), "Water deeply and regularly at the base of the plant."),
        (("prune", "sucker"), "Prune the suckers so the plant puts energy into fruit.")],
    "lower energy bills": [
        (("insulat", "draft"), "Seal drafts and improve insulation around windows and doors."),
        (("thermostat", "heating"), "Lower the thermostat a degree or two in winter."),
        (("appliance", "standby"), "Switch appliances off instead of leaving them on standby."),
        (("led", "bulb"), "Replace the old light bulbs in your home with LED lights.")],
    "write better code reviews": [
        (("small", "size"), "Ask for small changes that are easy to review."),
        (("kind", "tone", "respect"), "Keep a kind and respectful tone in every comment."),
        (("test",), "Check that the change comes with tests."),
        (("why", "reason", "explain"), "Explain the reason behind each request you make.")],
    "keep a conversation going": [
        (("question",), "Ask open questions that invite longer answers."),
        (("listen",), "Listen closely instead of planning what to say next."),
        (("follow",), "Follow up on details the other person mentions."),
        (("share", "story"), "Share a short story of your own in return.")],
    "organize a small party": [
        (("date",), "Pick a date that works for most of your guests."),
        (("invit",), "Send invitations at least two weeks ahead."),
        (("food", "snack", "drink"), "Plan simple food and drinks that are easy to serve."),
        (("venue", "room", "space"), "Make sure the room has space for everyone.")],
    "stay focused while working": [
        (("phone", "notification"), "Silence your phone and turn off notifications."),
        (("timer", "block", "pomodoro"), "Work in timed blocks with short breaks in between."),
        (("goal", "priorit", "list"), "Start the day with a short list of priorities."),
        (("desk", "noise", "quiet"), "Work at a tidy desk in a quiet place.")],
    "choose a laptop": [
        (("budget", "price"), "Decide on a budget before you compare models."),
        (("battery",), "Look for a battery that lasts a full working day."),
        (("memory", "ram"), "Get at least sixteen gigabytes of memory for smooth multitasking."),
        (("weight", "portable"), "Check the weight if you will carry it around.")],
    "make good coffee at home": [
        (("bean", "fresh"), "Buy fresh whole beans from a local roaster."),
        (("grind",), "Grind them yourself just before you start brewing."),
        (("ratio", "gram"), "Use a ratio of about sixty grams of coffee per liter of water."),
        (("temperature", "boiling"), "Brew with water just below boiling temperature.")],
    "start a journaling habit": [
        (("same time", "routine"), "Write at the same time each day to build a routine."),
        (("prompt",), "Use simple prompts when you do not know what to write."),
        (("honest",), "Be honest, since nobody else will read it."),
        (("short", "few lines", "minutes"), "Keep entries short, even a few lines count.")],
}
# 12 phrasings: the held-out split (4 phrasings never used in training x 24 topics) holds 96 prompts
PHRASINGS = ["How do I {t}?", "Any advice on how to {t}?", "What matters most if I want to {t}?",
             "I want to {t}. Where should I start?", "What are the key things to know to {t}?",
             "Can you help me {t}?", "What is the best way to {t}?", "Give me some tips to {t}.",
             "I am trying to {t}. What should I do?", "How can I {t}?", "What should I keep in mind to {t}?",
             "Explain how to {t}."]
INTROS = ["Here are the main things to focus on.", "Good question, there are a few parts to this."]
RAMBLE = ["There are many things to consider here and everyone is different.",
          "It is important to note that this can depend on a lot of factors.", "I hope this helps!"]
STYLES = (("thorough", 0.3), ("concise", 0.3), ("balanced", 0.2), ("rambling", 0.2))


def _prompts(split: str, seed: int) -> list[tuple[str, str]]:
    """(topic, phrasing) pairs of a split: every topic, the split's own phrasings (8 train, 4 held out).
    Held-out prompts were unseen topics until 2026-11-30: a 135M model cannot know an unseen topic's key
    aspects, so SFT scored 0.05 thoroughness there (docs/tasks.md, "Calibration"); the trade-off between
    thoroughness and concision is what the family tests, on prompts worded as never in training."""
    order = list(range(len(PHRASINGS)))
    random.Random(f"assistant/phrasings/{seed}").shuffle(order)
    cut = len(order) * 2 // 3
    keep = order[:cut] if split == "train" else order[cut:]
    return [(t, PHRASINGS[i]) for t in sorted(TOPICS) for i in keep]


def _demo(style: str, aspects, r: random.Random) -> str:
    sents = [s for _, s in aspects]
    r.shuffle(sents)
    if style == "thorough":
        return " ".join([r.choice(INTROS), *sents])
    if style == "concise":
        return " ".join(sents[: r.randint(1, 2)])
    if style == "balanced":
        return " ".join(sents[:3])
    return " ".join([RAMBLE[0], sents[0], RAMBLE[1], *sents[1:2], RAMBLE[2]])


def generate(n: int, seed: int, split: str = "train", exclude: set[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Prompts cycle over the split's topics and phrasings; n beyond that repeats a prompt with
    a fresh demonstration (training), so held-out sets hold each prompt once at most."""
    r = random.Random(f"assistant/{split}/{seed}")
    pairs = _prompts(split, seed)
    r.shuffle(pairs)
    if split != "train":
        n = min(n, len(pairs))
    styles, weights = zip(*STYLES)
    problems, sft = [], []
    for i in range(n):
        topic, phrasing = pairs[i % len(pairs)]
        question = phrasing.format(t=topic)
        pid = f"assistant-{split}-{i}"
        prompt = [{"role": "user", "content": question}]
        style = r.choices(styles, weights)[0]
        problems.append({"id": pid, "task": "assistant", "prompt": prompt, "reference": None,
                         "meta": json.dumps({"topic": topic, "demo_style": style})})
        sft.append({"id": f"{pid}-demo", "prompt": prompt, "completion": _demo(style, TOPICS[topic], r)})
    return problems, sft


# ---------------------------------------------------------------- judges

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'-]*")


def _aspects_in(sentence: str, aspects) -> set[int]:
    """Aspects a sentence mentions. It must read as a sentence (MIN_WORDS+ words) with keywords
    at most half of its words: a list of bare keywords mentions nothing."""
    words = _WORD.findall(sentence.lower())
    if len(words) < MIN_WORDS:
        return set()
    low = " " + " ".join(words) + " "
    hits = {i for i, (stems, _) in enumerate(aspects) if any(" " + s in low for s in stems)}
    n_kw = sum(any(w.startswith(s.split()[0]) for stems, _ in aspects for s in stems) for w in words)
    return hits if n_kw <= len(words) / 2 else set()


def _covered(sentences: list[str], aspects) -> int:
    """Aspects covered when each sentence explains at most one aspect (a maximum matching of
    sentences to the aspects they mention): name-dropping four aspects in one line covers one."""
    options = [_aspects_in(s, aspects) for s in sentences]
    owner: dict[int, int] = {}

    def assign(i: int, seen: set[int]) -> bool:
        for a in options[i]:
            if a not in seen:
                seen.add(a)
                if a not in owner or assign(owner[a], seen):
                    owner[a] = i
                    return True
        return False

    return sum(assign(i, set()) for i in range(len(sentences)))


def _text(response) -> str:
    return response if isinstance(response, str) else " ".join(m["content"] for m in response if m["role"] == "assistant")


def _aspects_of(meta) -> list:
    meta = json.loads(meta) if isinstance(meta, str) else (meta or {})
    return TOPICS[meta["topic"]]


def thoroughness(prompt, response, reference, meta) -> float:
    """Share of the topic's key aspects covered, each by a sentence of its own and counted once;
    repetition and padding add nothing."""
    aspects = _aspects_of(meta)
    return round(_covered(split_sentences(_text(response)), aspects) / len(aspects), 4)


def concision(prompt, response, reference, meta) -> float:
    """Share of sentences that cover an aspect, times a length factor (1 up to WORD_BUDGET words,
    then budget/words), times 0.8 per filler phrase. An answer that covers nothing scores 0."""
    aspects = _aspects_of(meta)
    text = _text(response)
    sents = split_sentences(text)
    relevant = [s for s in sents if _aspects_in(s, aspects)]
    if not relevant:
        return 0.0
    n_words = len(_WORD.findall(text))
    filler = sum(text.lower().count(f) for f in FILLER)
    return round(len(relevant) / len(sents) * min(1.0, WORD_BUDGET / n_words) * 0.8**filler, 4)
