"""Run inside the chroot by Autobahn's Python 2.7: the case ids a spec's patterns select, as
Autobahn itself resolves them, with each case's description. run.py records which cases each
agent must have results for (an agent with a case missing is a failure, not a pass), and
describes the excluded ones (reported as UNIMPLEMENTED).

    python2.7 cases.py '["*"]' '["9.*", "12.*", "13.*"]'      prints {case id: description} as JSON
"""
import json
import sys

from autobahntestsuite.case import CaseBasename, CaseCategories, Cases, CaseSetname, CaseSubCategories
from autobahntestsuite.caseset import CaseSet


def main():
    include, exclude = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    case_set = CaseSet(CaseSetname, CaseBasename, Cases, CaseCategories, CaseSubCategories)
    selected = case_set.parseSpecCases({"cases": include, "exclude-cases": exclude})
    describe = lambda case_id: Cases[case_set.CasesIndices[case_id] - 1].DESCRIPTION
    json.dump(dict((case_id, describe(case_id)) for case_id in selected), sys.stdout)

if __name__ == "__main__":
    main()
