"""The 256 words of pairing codes: short, distinct, easy to say and type.

A code is `NUMBER-WORD-WORD-WORD`: the number names a mailbox on the broker; the words (8 bits
each, from a CSPRNG; 3 or 4 of them, see `pairing`) are the password of the key exchange and never
leave the two machines.
"""

WORDS = tuple("""
    acid acorn actor adapt admit adult agent alarm album alert alien alley alpha amber ample angel
    anger angle ankle apple april apron arena argue armor arrow atlas atom attic audio aunt autumn
    avoid awake award bacon badge baker bamboo banjo barn basil basin batch beach beard beast bench
    berry bike bingo birch bison blade blank blaze blend bliss block bloom blues board boat bonus
    boost booth bottle brain brand brave bread brick bride brook brush bucket buddy bugle bunny
    cabin cable cactus camel camera candy canoe canyon cargo carpet carrot castle cedar chalk charm
    cheese cherry chess chief chili chorus cider cinema circle civic clay cliff clock cloud clover
    coach cobra cocoa comet coral cotton couch cousin crane crayon cream cricket crown crystal cube
    cupid curry cycle daisy dance delta denim desert diary dinner disco dolphin donkey dragon drama
    dream drum eagle earth easel echo eclipse elbow ember empire engine equal fabric falcon fancy
    feast fern ferry fiber fiddle field finch flame flute focus forest fossil fox frost fruit
    galaxy garden garlic gecko ghost giant ginger glacier globe glove goose gospel grape gravel
    guitar habit hammer harbor harvest hazel helmet hero honey horizon hotel humble iceberg igloo
    indigo insect island ivory jacket jaguar jelly jewel jungle kayak kettle kiwi koala ladder
    lagoon lamp lantern laser lemon lilac linen lion lizard lobster locket lotus lunar magnet mango
    maple marble meadow melon metal mint mirror mocha monkey mosaic motor muffin museum napkin
    nectar needle noble nomad oasis ocean olive omega onion opera orange orbit orchid otter owl
    oyster
""".split())

assert len(WORDS) == 256 and len(set(WORDS)) == 256
